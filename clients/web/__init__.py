"""The browser dashboard: static files the server ships as package data (``streamer.web``)."""
