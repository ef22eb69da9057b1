from timmserve.cli import main

main()
