from load_controller.service import main

main()
