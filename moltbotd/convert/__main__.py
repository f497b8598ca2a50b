import sys

from moltbotd.convert.main import main

sys.exit(main(sys.argv))
