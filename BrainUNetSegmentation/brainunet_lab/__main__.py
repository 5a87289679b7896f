"""``python -m brainunet_lab ...``: the brainunet command with the lab's commands, for a machine where the
package is on PYTHONPATH but not installed (no entry points), such as the lent GPU machine."""
import sys

from brainunet import cli

from .cli import add_commands

cli.PLUGIN_LOADERS.append(add_commands)
sys.exit(cli.main())
