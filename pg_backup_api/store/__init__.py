"""State in files under Barman's home: job and output files, index, watches, claims, audit log."""
