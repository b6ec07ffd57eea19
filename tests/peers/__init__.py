"""Protocol peers: faithful stand-ins for the PBXs and platforms Stellwerk talks to, from their
published specs."""
