"""Protocol peers: stand-ins for the platforms Stellwerk talks to, from their API specs."""
