import sys

from igsm.cli import main
from igsm.data.common import WriteError

try:
    main()
except WriteError as err:
    # A full disk in any stage: the file it was writing and the space left, not a traceback.
    sys.exit(f"Error: {err}")
