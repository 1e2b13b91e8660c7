from smgw_link.service import main

main()
