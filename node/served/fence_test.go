package served

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestFence(t *testing.T) {
	ctx := context.Background()
	var f Fence
	if err := f.Enter(ctx); err != nil {
		t.Fatal(err)
	}
	// Close waits for the I/O inside.
	closed := make(chan func())
	go func() {
		open, err := f.Close(ctx)
		if err != nil {
			t.Error(err)
		}
		closed <- open
	}()
	select {
	case <-closed:
		t.Fatal("closed with an I/O inside")
	case <-time.After(50 * time.Millisecond):
	}
	f.Leave()
	open := <-closed
	if !f.Closed() {
		t.Fatal("not closed")
	}
	if _, err := f.Close(ctx); !errors.Is(err, ErrFenced) {
		t.Fatalf("second close: %v", err)
	}
	// New I/O waits, and gives up with its context.
	short, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	if err := f.Enter(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("enter while closed: %v", err)
	}
	entered := make(chan error)
	go func() { entered <- f.Enter(ctx) }()
	select {
	case err := <-entered:
		t.Fatalf("entered while closed: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	open()
	open() // twice is harmless
	if err := <-entered; err != nil {
		t.Fatal(err)
	}
	// A close whose wait gives up opens the fence again.
	short2, cancel2 := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel2()
	if _, err := f.Close(short2); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("close with an I/O that never leaves: %v", err)
	}
	if f.Closed() {
		t.Fatal("left closed after giving up")
	}
	f.Leave()
	open, err := f.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	open()
}
