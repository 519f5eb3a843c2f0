import sys

from streamer_client import main

sys.exit(main(prog="python -m streamer_client"))
