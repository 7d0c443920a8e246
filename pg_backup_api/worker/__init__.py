"""The detached worker: runs barman for one operation, its ssh master, its processes."""
