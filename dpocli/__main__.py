from dpocli.cli.entry import main

main()
