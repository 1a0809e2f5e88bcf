module coder-proxy.invalid/yamux-go

go 1.26

require github.com/hashicorp/yamux v0.1.2
