module github.com/tether-ws/tether/interop

go 1.26.0

require (
	github.com/coder/websocket v1.8.15
	github.com/gorilla/websocket v1.5.3
	github.com/tether-ws/tether v0.0.0
	go.uber.org/goleak v1.3.0
	golang.org/x/time v0.16.0
)

replace github.com/tether-ws/tether => ../
