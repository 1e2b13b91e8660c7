from web.service import main

main()
