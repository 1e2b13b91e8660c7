from history.service import main

main()
