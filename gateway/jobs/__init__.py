"""Jobs: generations that outlive the connection that started them (store + runner)."""
