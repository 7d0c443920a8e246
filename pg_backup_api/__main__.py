import sys

from pg_backup_api.cli import main

sys.exit(main())
