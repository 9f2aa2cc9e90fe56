from dpocli.entry import main

main()
