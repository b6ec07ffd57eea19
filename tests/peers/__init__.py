"""Protocol peers the tests run against: our own descriptions of ARI, ESL and Twilio."""
