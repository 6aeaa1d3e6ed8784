// Command agent is the test workload of the local node: it reads its token
// file when it starts and again on every SIGHUP, and logs a short SHA-256
// fingerprint of what it read (never the token), so a test can tell which
// token the running process holds. Called as `kill`, it sends a signal, so
// the image can run the operator's default Signal command `kill -HUP 1`.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

func main() {
	if filepath.Base(os.Args[0]) == "kill" {
		os.Exit(kill(os.Args[1:]))
	}
	path := os.Getenv("TOKEN_FILE")
	if path == "" {
		path = "/var/run/secrets/agenttoken/token"
	}
	hup := make(chan os.Signal, 4)
	signal.Notify(hup, syscall.SIGHUP)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	load(path, "start")
	for {
		select {
		case <-hup:
			load(path, "SIGHUP")
		case <-stop:
			fmt.Println("agent: stopping")
			return
		}
	}
}

// load reads the token file and logs its fingerprint.
func load(path, why string) {
	data, err := os.ReadFile(path)
	if err != nil {
		fmt.Printf("agent: %s: cannot read the token file: %v\n", why, err)
		return
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(string(data))))
	fmt.Printf("agent: %s: loaded token sha256:%s\n", why, hex.EncodeToString(sum[:])[:16])
}

// kill implements `kill [-SIGNAL] PID...` with the signals a reload uses.
func kill(args []string) int {
	sig := syscall.SIGTERM
	if len(args) > 0 && strings.HasPrefix(args[0], "-") {
		names := map[string]syscall.Signal{
			"HUP": syscall.SIGHUP, "1": syscall.SIGHUP, "TERM": syscall.SIGTERM, "15": syscall.SIGTERM,
			"USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "INT": syscall.SIGINT, "2": syscall.SIGINT,
		}
		s, ok := names[strings.TrimPrefix(strings.TrimPrefix(args[0], "-"), "SIG")]
		if !ok {
			fmt.Fprintf(os.Stderr, "kill: unknown signal %s\n", args[0])
			return 2
		}
		sig = s
		args = args[1:]
	}
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: kill [-SIGNAL] PID...")
		return 2
	}
	status := 0
	for _, a := range args {
		pid, err := strconv.Atoi(a)
		if err == nil {
			err = syscall.Kill(pid, sig)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "kill: %s: %v\n", a, err)
			status = 1
		}
	}
	return status
}
