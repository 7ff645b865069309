//go:build !ukai_broken

package lun

// dropWrite is false in every real build (see broken.go).
func dropWrite(int) bool { return false }
