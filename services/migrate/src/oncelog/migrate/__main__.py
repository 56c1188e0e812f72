"""Run the deployment one-shot: `python -m oncelog.migrate`."""

from oncelog.migrate.deploy import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
