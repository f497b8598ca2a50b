from moltbotd.control.daemon import main

main()
