"""The SQLite database the supervisor owns.

    database.py    opening, configuring, migrating; one-transaction writes; SQLite errors translated
    migrations.py  the schema as an ordered list of named migrations
    sessions.py    SessionStore: sessions, messages, pins, summaries, runs
"""
