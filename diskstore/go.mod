module github.com/tether-ws/tether/diskstore

go 1.26.0

replace github.com/tether-ws/tether => ../

require (
	github.com/coder/websocket v1.8.15
	github.com/tether-ws/tether v0.0.0
	go.etcd.io/bbolt v1.4.3
	go.uber.org/goleak v1.3.0
	golang.org/x/time v0.16.0
)

require golang.org/x/sys v0.29.0 // indirect
