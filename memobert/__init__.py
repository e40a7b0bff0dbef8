"""memobert: command line, typed configs, the shard schema and the demo that ties the stages together."""
