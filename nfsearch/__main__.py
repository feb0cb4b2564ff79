from nfsearch.cli import main

main()
