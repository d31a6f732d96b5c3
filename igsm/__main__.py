import sys

from igsm.cli import main

try:
    main()
except OSError as err:
    from igsm.data.common import WriteError

    if not isinstance(err, WriteError):
        raise
    # A full disk in any stage: the file it was writing and the space left, not a traceback.
    sys.exit(f"Error: {err}")
