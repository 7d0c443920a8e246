"""Use cases behind the HTTP layer and the CLI: operations, discovery, doctor, auth, paging."""
