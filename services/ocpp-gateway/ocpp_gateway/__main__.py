from chargegate.lean import service_process

service_process()  # before the service's imports: rich stays out of the process

from ocpp_gateway.service import main  # noqa: E402

if __name__ == "__main__":
    main()
