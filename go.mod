module github.com/ukai-storage/ukai

go 1.26.0

require go.etcd.io/bbolt v1.4.3

require (
	github.com/stretchr/testify v1.11.1 // indirect
	golang.org/x/sync v0.16.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
