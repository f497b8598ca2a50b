import sys

from moltbotd.worker.main import main

sys.exit(main(sys.argv))
