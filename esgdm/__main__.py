from esgdm.demo import main

main()
