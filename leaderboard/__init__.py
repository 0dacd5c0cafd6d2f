"""The leaderboard: submissions of maps, a SQLite results store, standardized runs, tables and a site."""
