module github.com/tether-ws/tether/bench

go 1.26.0

replace github.com/tether-ws/tether => ../

require (
	github.com/coder/websocket v1.8.15
	github.com/tether-ws/tether v0.0.0-00010101000000-000000000000
	go.uber.org/goleak v1.3.0
)

require golang.org/x/time v0.16.0 // indirect
