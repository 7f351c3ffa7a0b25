from fashion_lightning.tune.command import main

if __name__ == "__main__":
    main()
