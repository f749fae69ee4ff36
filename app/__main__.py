"""`python -m app` is the same as `lmstack`."""

from app.main import main

if __name__ == "__main__":
    main()
