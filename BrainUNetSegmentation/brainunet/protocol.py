"""What the command-line worker and the Slicer bridge share: output line prefixes and exit codes.

The Slicer module runs ``brainunet segment --progress machine`` in a separate process and reads its
standard output; these are the only names both sides need, so neither imports the other.
"""
PROGRESS_PREFIX = "BRAINUNET_PROGRESS"  # "BRAINUNET_PROGRESS <fraction 0..1> <message>"
RESULT_PREFIX = "BRAINUNET_RESULT"  # "BRAINUNET_RESULT <json>" once the outputs are written

# a worker's note "<sequence name> left out of the statistics: <why>": the panel then leaves that input out too
LEFT_OUT_NOTE = "left out of the statistics"

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # one "error: ..." line says what to fix
EXIT_WEIGHTS = 3  # missing or corrupt weights
EXIT_UNEXPECTED = 1  # a failure BrainUNet did not foresee (a bug, or memory): its traceback, then one "error:" line
EXIT_CANCELLED = 130

EXIT_CODES_HELP = ("exit status: 0 done; 1 an unexpected error (its traceback, then one 'error:' line); "
                   "2 bad input (one 'error:' line says what to fix); 3 missing or corrupt weights; 130 cancelled")
