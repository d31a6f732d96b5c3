from igsm.cli import main

main()
