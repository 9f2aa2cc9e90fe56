from dpocli.cli import main

main()
