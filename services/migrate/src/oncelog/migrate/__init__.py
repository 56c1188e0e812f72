"""The deployment one-shot: migrate PostgreSQL, create login users, provision JetStream."""

from oncelog.migrate.deploy import GROUPS, Login, create_logins, main, parse_login, run

__all__ = ["GROUPS", "Login", "create_logins", "main", "parse_login", "run"]
