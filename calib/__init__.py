"""The lab that times the real machine to make or judge a cost profile; product code never imports it."""
