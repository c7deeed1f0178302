// Package interop tests tether against peers it did not write: the
// gorilla/websocket client, the Node.js ws package, and tether's own
// JavaScript client (js/tether.js) running in Node. Everything is in the
// tests; see README.md for what they check and how to run them.
package interop
