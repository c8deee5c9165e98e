from traflow_cli.cli.app import main

main()
