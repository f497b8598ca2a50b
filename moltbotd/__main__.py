from moltbotd.daemon import main

main()
