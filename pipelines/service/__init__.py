"""The factory as a service: Airflow environment, users, Postgres, `factory up/down`, approvals."""
