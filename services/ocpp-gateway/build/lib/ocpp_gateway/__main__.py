from ocpp_gateway.service import main

main()
