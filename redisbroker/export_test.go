package redisbroker

// KeyOf returns the key or channel of a kind ("h", "t", ...) for name
// under the default prefix, for tests that look into Redis.
func KeyOf(kind, name string) string { return New(nil).key(kind, name) }
