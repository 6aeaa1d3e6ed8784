// Command agent is the test workload of the local node: it reads its token
// file when it starts and again on every SIGHUP, and logs a short SHA-256
// fingerprint of what it read (never the token), so a test can tell which
// token the running process holds. Called as `kill`, it sends a signal, so
// the image can run the operator's default Signal command `kill -HUP 1`.
//
// With USE_URL set, it also uses the token: every USE_EVERY (default 1s) a
// GET of USE_URL with `Authorization: Bearer <token>` (the file read anew
// each time), trusting the CA in USE_CA_FILE, and logs the status code.
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
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
	if url := os.Getenv("USE_URL"); url != "" {
		go use(url, path)
	}
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

// use GETs url with the token in path, forever.
func use(url, path string) {
	every, err := time.ParseDuration(os.Getenv("USE_EVERY"))
	if err != nil || every <= 0 {
		every = time.Second
	}
	roots := x509.NewCertPool()
	if pem, err := os.ReadFile(os.Getenv("USE_CA_FILE")); err == nil {
		roots.AppendCertsFromPEM(pem)
	}
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}},
	}
	for {
		data, err := os.ReadFile(path)
		if err == nil {
			req, _ := http.NewRequest(http.MethodGet, url, nil)
			req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(data)))
			req.Header.Set("User-Agent", "agenttoken-e2e-agent/1.0")
			resp, err := client.Do(req)
			if err != nil {
				fmt.Printf("agent: use: %v\n", err)
			} else {
				resp.Body.Close()
				fmt.Printf("agent: use: %d\n", resp.StatusCode)
			}
		}
		time.Sleep(every)
	}
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
