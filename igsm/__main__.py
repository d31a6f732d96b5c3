import sys

from igsm.data.common import WriteError
from igsm.plugins import PluginError, load_from_environment

try:
    # The config's plugins (igsm.plugins), before the commands are built: their choices read the registries.
    load_from_environment()
except PluginError as err:
    sys.exit(f"Error: {err}")

from igsm.cli import main  # noqa: E402

try:
    main()
except WriteError as err:
    # A full disk in any stage: the file it was writing and the space left, not a traceback.
    sys.exit(f"Error: {err}")
