module github.com/tether-ws/tether/examples/chat

go 1.26.0

replace github.com/tether-ws/tether => ../..

replace github.com/tether-ws/tether/diskstore => ../../diskstore

require (
	github.com/tether-ws/tether v0.0.0
	github.com/tether-ws/tether/diskstore v0.0.0
	go.uber.org/goleak v1.3.0
)

require (
	github.com/coder/websocket v1.8.15 // indirect
	go.etcd.io/bbolt v1.4.3 // indirect
	golang.org/x/sys v0.29.0 // indirect
	golang.org/x/time v0.16.0 // indirect
)
