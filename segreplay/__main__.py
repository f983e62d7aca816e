from segreplay.cli import main

main()
