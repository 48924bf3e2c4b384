from ttds.cli import main

main()
